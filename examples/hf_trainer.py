"""A federated client around a Hugging Face Trainer: causal-LM fine-tuning on JSONL text.

    FEDROT_CLIENT_SERVER=server:50051 FEDROT_CLIENT_TOKEN=... \
        python examples/hf_trainer.py my-data.jsonl --out final-adapter/

Each JSONL line is {"prompt": "...", "completion": "..."}; the Trainer learns the whole text.
The server's training settings become the TrainingArguments (fedrot_client.hf), and
hf.run_task loads each round's adapter, trains, and submits the result.
"""

import argparse
import tempfile

from datasets import load_dataset
from transformers import DataCollatorForLanguageModeling, Trainer

import fedrot_client
from fedrot_client import hf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--out", default="final-adapter")
    options = parser.parse_args()
    rows = load_dataset("json", data_files=options.data, split="train")

    with fedrot_client.connect() as fed, tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = fed.build_model(), fed.tokenizer

        def tokenize(row, max_length):
            text = row["prompt"] + row["completion"] + tokenizer.eos_token
            return tokenizer(text, truncation=True, max_length=max_length)

        for task in fed.tasks():
            data = rows.map(tokenize, fn_kwargs={"max_length": task.training.max_length},
                            remove_columns=rows.column_names)
            trainer = Trainer(
                model=model,
                args=hf.training_arguments(task, scratch, disable_tqdm=True),
                train_dataset=data,
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            )
            hf.run_task(task, trainer)  # load_into, train (progress, early stop), submit
        fed.save_final(options.out)


if __name__ == "__main__":
    main()
