"""Code generation: Plan + Pattern -> Triton source text (imports neither torch nor triton)."""
