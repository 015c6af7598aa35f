"""Developer tools, run as `python -m dvtrain.tools.<name>`: `bench` (training-step speed against the
authors' loop; `--eval` hands over to `bench_eval`, evaluation throughput at 1 and 2 launched processes).
They use the package; nothing in it uses them."""
