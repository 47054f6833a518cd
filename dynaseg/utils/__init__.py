"""The ground floor: helpers every other package may use (files, collectives). Imports nothing above it."""
