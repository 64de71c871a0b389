"""Speed benchmarks, one module (and one `main(args)`) each: `boltzformer bench decoder|volume`.

`decoder`: the decoder's cross-attention variants side by side; `volume`: an end-to-end
`segment` of a synthetic CT with its stages timed. `machine` holds what both report.
"""
