"""The math of minitodi, read in one sitting: device, layers, losses, model, optim, gradcheck.

Nothing here imports the rest of minitodi. The machinery that runs this math faster (threads over
shards and blocks of rows, the fused CuPy kernels) wraps it from outside, in :mod:`minitodi.parallel`
and :mod:`minitodi.fused`.
"""
