"""EC-DiT models: `config.ModelConfig`, `sizes.preset`, `ecdit.ECDiT` / `build_model`, `text.TextEncoder`,
`params` (the `ecdit params` command). Submodules are imported explicitly (this package stays import-light so
that `ecdit.models.config` does not pull in JAX)."""
