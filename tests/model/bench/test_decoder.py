"""`bench decoder`: the table says which implementation `auto` runs, in the table's own words."""

from boltzformer.bench.decoder import bench_decoder, decoder_markdown


def test_bench_decoder_rows_and_auto_on_cpu():
    result = bench_decoder(sizes=(16,), repeats=1, device="cpu")
    (row,) = result["rows"]
    assert row["tokens"] == 256 and 0 < row["k"] < 256
    assert {"dense", "sparse_gather+sampling", "sparse_as_dense_mask+sampling"} <= set(row["time_ms"])
    assert row["flop_ratio_dense_over_sparse"] > 1
    assert result["auto_impl"] == "gather"
    assert "runs **gather**" in decoder_markdown(result)


def test_markdown_calls_the_cuda_choice_masked_not_dense():
    # On CUDA, auto runs impl "dense" over the sampled tokens: the table's "dense" column is
    # unsampled attention, so the text must not call the choice "dense".
    result = bench_decoder(sizes=(16,), repeats=1, device="cpu")
    result["auto_impl"] = "dense"
    text = decoder_markdown(result)
    assert "runs **masked" in text and "runs **dense**" not in text
