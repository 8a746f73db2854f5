"""The registered stages of the cleftwise pipeline, in run order.

Adding a stage: write one module that defines its config dataclass, its
:class:`~cleftwise.blockwise.step.BlockStep` (or a driver function) and a
:class:`~cleftwise.blockwise.stages.Stage` record named ``STAGE``, then add one line below.
The pipeline config gains a section named after the stage; ``--stages``, ``--status``,
resume and re-running on changed settings follow from the record (docs/adding_a_stage.md).
"""

from cleftwise.blockwise.stages import Registry
from cleftwise.postprocess import classify, connectome_stage, partners_step, predict, segment

REGISTRY = Registry(
    predict.STAGE,
    segment.STAGE,
    partners_step.STAGE,
    classify.STAGE,
    connectome_stage.STAGE,
)

#: stage names in run order
STAGES = REGISTRY.names
