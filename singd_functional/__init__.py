"""singd_functional: SINGD as a pure torch.func optimizer, plus a drop-in torch.optim face."""
