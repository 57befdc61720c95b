"""Front end: .attn text -> AST with spans -> Pattern IR, with every diagnostic."""
