"""Blockwise engine: block grid, completion ledger, backends and sliding-window prediction.

Public surface: :class:`~blockwise.task.BlockTask`, :func:`~blockwise.runner.run_task`,
:class:`~blockwise.runner.BackendConfig`, :func:`~blockwise.grid.plan_blocks`.
"""

from .errors import BlockwiseError
from .grid import Block, plan_blocks
from .runner import BackendConfig, run_task, task_status
from .task import BlockTask

__all__ = ["BlockwiseError", "Block", "plan_blocks", "BackendConfig", "run_task", "task_status",
           "BlockTask"]
