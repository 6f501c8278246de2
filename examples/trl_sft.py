"""A federated client around TRL's SFTTrainer: instruction tuning with the loss on the
completions only (TRL's default for prompt/completion data).

    FEDROT_CLIENT_SERVER=server:50051 FEDROT_CLIENT_TOKEN=... \
        python examples/trl_sft.py my-data.jsonl --out final-adapter/

Each JSONL line is {"prompt": "...", "completion": "..."} (or chat {"messages": [...]}).
"""

import argparse
import tempfile

from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

import fedrot_client
from fedrot_client import hf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--out", default="final-adapter")
    options = parser.parse_args()
    data = load_dataset("json", data_files=options.data, split="train")

    with fedrot_client.connect() as fed, tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = fed.build_model(), fed.tokenizer
        for task in fed.tasks():
            args = hf.training_arguments(task, scratch, args_class=SFTConfig, disable_tqdm=True)
            trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                                 processing_class=tokenizer)
            hf.run_task(task, trainer)  # load_into, train (progress, early stop), submit
        fed.save_final(options.out)


if __name__ == "__main__":
    main()
