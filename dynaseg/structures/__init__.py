from dynaseg.structures.batch import Batch
from dynaseg.structures.instances import Instances

__all__ = ["Batch", "Instances"]
