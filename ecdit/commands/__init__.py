"""The `ecdit` commands: one module per command, each its absl flags and a thin `main(argv)` over library
functions (`ecdit.cli` dispatches; `flags.py` holds what they share). Library code never imports this package
and defines no flags."""
