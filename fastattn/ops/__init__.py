"""Public ops: validation, backend dispatch, torch.library custom ops and autograd.Functions."""
