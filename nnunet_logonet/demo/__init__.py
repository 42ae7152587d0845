"""``logonet_demo``: the one-command comparison of LoGoNet and nnU-Net on the built-in phantom.

:mod:`.settings` (what a run is), :mod:`.state` (which stages finished), :mod:`.runner` (one nnU-Net
command, logged and measured), :mod:`.stages` (the pipeline), :mod:`.costs` (parameters, FLOPs),
:mod:`.report` (table, JSON, figures), :mod:`.cli` (the command).
"""

from nnunet_logonet.demo.cli import main, run_demo

__all__ = ["main", "run_demo"]
