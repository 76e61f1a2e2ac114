"""fntk's benchmark scripts (``python -m fntk_bench.bench_ntk``, ...) and the baselines they time
(the paper code's column-by-column NTK products, the PyTorch NTK tutorial's recipes). Installed
with fntk so that ``fntk bench`` runs from a wheel; results of the scripts' ``main`` go to
``benchmarks/RESULTS.md`` of a source checkout."""
