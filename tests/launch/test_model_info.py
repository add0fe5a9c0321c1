from launch.model_info import main


def test_info_prints_exact_counts_for_7b(capsys):
    main(["model=llama1_7b"])
    out = capsys.readouterr().out
    assert "total parameters:         6,738,415,616" in out
    assert "non-embedding parameters: 6,607,343,616" in out  # minus the 32000 x 4096 embedding
    assert "training FLOPs per token at seq_len=2048" in out
