"""``logonet_demo``: the one-command comparison of LoGoNet and nnU-Net on the built-in phantom.

:mod:`.settings` (what a run is), :mod:`.state` (which stages finished), :mod:`.runner` (one nnU-Net
command, logged and measured), :mod:`.stages` (the pipeline), :mod:`.costs` (parameters, FLOPs),
:mod:`.report` (table, JSON, figures), :mod:`.cli` (the command).

``main`` and ``run_demo`` are imported on first use: the package itself stays light, because
nnU-Net's worker pools start with ``spawn`` and every worker of ``python -m nnunet_logonet.demo.rank``
imports this package again (the command's imports, torch and nnU-Net's trainer, cost ~7 s each).
"""

__all__ = ["main", "run_demo"]


def __getattr__(name: str):
    if name in __all__:
        from nnunet_logonet.demo import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
