"""fastattn's drop-in modules under TorchScript. Their forwards call fastattn's kernels from Python, so
``torch.jit.script`` cannot compile them: scripting one raises an error that says so (instead of TorchScript's
complaint about some line inside fastattn). ``torch.jit.trace`` works: while it records, the ops call the kernels
through their custom ops (fastattn.ops.batching.graph_capture), which the trace keeps."""
from torch import nn


def refuse_script(mod: nn.Module):
    """A __prepare_scriptable__ for fastattn's modules: torch.jit.script calls it on every module it compiles."""
    name = type(mod).__name__
    raise RuntimeError(f"torch.jit.script: fastattn.nn.{name} cannot be scripted: its forward runs fastattn's kernels "
                       f"from Python. Use torch.compile, torch.export or torch.jit.trace, or keep torch.nn.{name} in "
                       f"the model to script (fastattn.convert(..., skip=...))")
