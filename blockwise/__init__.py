"""Blockwise engine: block grid, completion ledger, backends and sliding-window prediction.

Public surface: :class:`~cleftwise.blockwise.step.BlockStep`, :func:`~cleftwise.blockwise.runner.run_task`,
:class:`~cleftwise.blockwise.runner.BackendConfig`, :func:`~cleftwise.blockwise.grid.plan_blocks`.
"""

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block, plan_blocks
from cleftwise.blockwise.runner import BackendConfig, run_task, task_status
from cleftwise.blockwise.step import ArraySpec, BlockStep

__all__ = ["BlockwiseError", "Block", "plan_blocks", "BackendConfig", "run_task", "task_status",
           "BlockStep", "ArraySpec"]
