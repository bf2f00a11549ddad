"""Demo data: the structured sign source, the synthetic skeleton generator, the reference texts
and the dictionary renderer.

They serve the demo (``gsp synth``, ``gsp run``), the tests and the benchmarks, not the library:
``gsp`` and ``mc`` never import this package; it may import both (``mc.data.write_pyskl``, the
``mc.keypoints`` constants, ``gsp.schema``).
"""
