"""Independent float64 oracles of the spec (``docs/spec.md``), sharing no code with ``ipcv_kernels``.

- ``oracles.spec``: the Qwen2-VL tower oracle (``ipcv_oracle``), built from the tower's sub-modules.
- ``oracles.towers``: tiny Qwen2.5-VL / Qwen3-VL / InternVL models and their tower oracle
  (``ipcv_tower_oracle``).
- ``oracles.serial``: concurrent calls against the same calls made one after the other (``hammer``).
"""
