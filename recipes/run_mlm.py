"""Masked-LM training with the Hugging Face Trainer and ConAdv, in the shape of transformers'
`examples/pytorch/language-modeling/run_mlm.py`: a run_mlm-style script migrates by importing
`ConAdvTrainer` / `ConAdvTrainingArguments` instead of `Trainer` / `TrainingArguments`.

    python recipes/run_mlm.py --model_type bert --config_overrides "hidden_size=64,num_hidden_layers=2,\\
        num_attention_heads=2,intermediate_size=128" --tokenizer_name runs/tok --train_file corpus.txt \\
        --output_dir runs/mlm --max_steps 50 --conadv '{"epsilon": 0.1, "norm": "l2"}'
    torchrun --nproc_per_node 2 recipes/run_mlm.py ... --deepspeed ds_config.json
    python recipes/run_mlm.py args.json            # every argument from a JSON file

Offline: the text comes from local files (`datasets.load_dataset("text", data_files=…)`), the
tokenizer from a local folder (`--tokenizer_name`), the model from a config (`--model_type`) or a
local checkpoint (`--model_name_or_path`).
"""


import sys
from dataclasses import dataclass, field
from typing import Optional

from conadv_ds.cli import run_launched
from conadv_ds.data.text import group_texts
from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "a local checkpoint to start from"})
    model_type: Optional[str] = field(default=None, metadata={"help": "train from scratch: e.g. bert"})
    config_overrides: Optional[str] = field(default=None, metadata={
        "help": "with --model_type: overrides of the default config, e.g. hidden_size=64,num_hidden_layers=2"})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "a local tokenizer folder"})


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "a text file, one text per line"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "a text file for evaluation"})
    max_seq_length: int = field(default=128)
    mlm_probability: float = field(default=0.15)
    preprocessing_num_workers: Optional[int] = field(default=None)


def main(argv: Optional[list[str]] = None) -> ConAdvTrainer:
    from transformers import (
        CONFIG_MAPPING,
        AutoConfig,
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        HfArgumentParser,
    )

    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ConAdvTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if data_args.train_file is None:
        parser.error("--train_file is required (a local text file)")
    if model_args.tokenizer_name is None and model_args.model_name_or_path is None:
        parser.error("--tokenizer_name (a local tokenizer folder) or --model_name_or_path is required")

    import datasets

    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    raw = datasets.load_dataset("text", data_files=files)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if model_args.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)
    else:
        if model_args.model_type not in CONFIG_MAPPING:
            parser.error(f"--model_type={model_args.model_type!r}: allowed: {', '.join(sorted(CONFIG_MAPPING))}")
        config = CONFIG_MAPPING[model_args.model_type](vocab_size=len(tokenizer))
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**config.to_dict()))
    block = min(data_args.max_seq_length, model.config.max_position_embeddings)

    def tokenize(examples):
        return tokenizer([t for t in examples["text"] if t.strip()], return_special_tokens_mask=True)

    with training_args.main_process_first(desc="tokenize and group"):
        tokenized = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers,
                            remove_columns=["text"])
        grouped = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers,
                                fn_kwargs={"block_size": block})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
    trainer = ConAdvTrainer(model=model, args=training_args, train_dataset=grouped["train"],
                            eval_dataset=grouped.get("validation"), data_collator=collator)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    if "validation" in grouped:
        trainer.log_metrics("eval", trainer.evaluate())
    return trainer


if __name__ == "__main__":
    run_launched(main)
