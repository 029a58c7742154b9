"""EC-DiT models: `ecdit.ECDiT` / `build_model`, `text.TextEncoder`,
`params` (the `ecdit params` command). Submodules are imported explicitly (this package stays import-light so
that importing one does not pull in the others)."""
