"""Test-session settings shared by every launched rank."""

import os

# DeepSpeed JIT-builds its CPU shared-memory op at every engine start unless a build with the same
# flags is cached; a cache of the suite's own keeps other programs' builds from invalidating it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_conadv_ds_tests"))
