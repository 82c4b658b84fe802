"""recipes/run_mlm.py, a run_mlm-style client of ConAdvTrainer: offline text file, local tokenizer,
a model from --model_type/--config_overrides (dropout off, so that the clean and adversarial
halves differ by δ alone), arguments from the command line or a JSON file."""

import json
import runpy

import pytest

from tests.distributed import ROOT


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conadv_ds.data.text import embedded_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("mlm")
    corpus = embedded_corpus()[:300]
    (d / "train.txt").write_text("\n".join(corpus))
    train_tokenizer(corpus, 1000, d / "tok")
    return d


def args_for(d, out, conadv):
    return {"model_type": "bert", "tokenizer_name": str(d / "tok"), "train_file": str(d / "train.txt"),
            "config_overrides": "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
                                "hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0",
            "max_seq_length": 32, "output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4,
            "logging_steps": 2, "report_to": "none", "use_cpu": True, "save_strategy": "no", "conadv": conadv}


def check(trainer, out, epsilon):
    """Logged every 2 steps: the Trainer's loss is the mean of the clean and adversarial halves
    (λ = 0.5), and the halves differ (without dropout, δ = 0 would make them equal)."""
    logs = [h for h in trainer.state.log_history if "adv_loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert h["loss"] == pytest.approx((h["clean_loss"] + h["adv_loss"]) / 2, abs=1e-4)
        assert abs(h["adv_loss"] - h["clean_loss"]) > 1e-4 and h["clean_loss"] > 0, h
    assert json.loads(trainer.args.to_json_string())["conadv"]["epsilon"] == epsilon
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 1


def test_command_line_with_inline_conadv(inputs, tmp_path):
    main = runpy.run_path(str(ROOT / "recipes" / "run_mlm.py"))["main"]
    argv = []
    for k, v in args_for(inputs, tmp_path / "out", '{"epsilon": 0.1, "norm": "l2"}').items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])
    check(main(argv), tmp_path / "out", 0.1)


def test_json_file_arguments(inputs, tmp_path):
    main = runpy.run_path(str(ROOT / "recipes" / "run_mlm.py"))["main"]
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args_for(inputs, tmp_path / "out", {"epsilon": 0.2, "norm": "l2", "steps": 2})))
    check(main([str(path)]), tmp_path / "out", 0.2)
