"""Inference: the predictor, overlays, folder prediction, optional speed-ups."""

# Instances scoring at least this are drawn by ``predict`` and returned by ``serve`` unless the user
# says otherwise (detectron2's demo default). FCOS-based models score sqrt(p_cls · p_ctr), so 0.3
# would draw p_cls · p_ctr = 0.09: on the demo's val images 0.5 draws 138 instances for 171 objects,
# 88 % of them right, where 0.3 drew 218, 59 % right (docs/one_stage_accuracy.md).
DRAW_SCORE_THRESHOLD = 0.5
