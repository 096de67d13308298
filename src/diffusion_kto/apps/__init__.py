"""The commands built on the library, one module per command: ``demo`` (`dkto demo`), ``bench_align``
(`dkto bench align`), ``utility2d`` (`dkto bench utility2d`), ``bench_step`` (`dkto bench step`) and
``bench_official`` (the official script's step design that `dkto bench step --end-to-end` times ours against).

Apps sit at the top: they use the public functions of training, evaluation, sampling and the shapes world, and
nothing below imports them."""
