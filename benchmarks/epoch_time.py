"""Wall-clock time of full training epochs (data + augmentation + steps), rules interleaved.

    python benchmarks/epoch_time.py --rules lls,bp --rounds 2

Each round trains one epoch of every rule in turn (a b a b ...), each rule on its own network, so
slow and fast periods of a shared machine hit all rules alike. Prints every epoch's time and each
rule's median with its ratio to the first rule.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

import lls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="smallconv")
    parser.add_argument("--rules", default="lls,bp")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = parser.parse_args()
    lls.tune_malloc()  # as the lls command does

    data = lls.load_dataset(args.dataset)
    loaders = lls.Loaders.for_dataset(data, args.batch_size, channels_last=args.channels_last)
    trainers = {
        name: lls.build_trainer(args.model, name, data, channels_last=args.channels_last)
        for name in args.rules.split(",")
    }

    print(
        f"{args.model} on {args.dataset}, batch {args.batch_size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(args.rounds):
        for name, trainer in trainers.items():
            took = lls.train_epoch(trainer, loaders.train, round_, progress=False).seconds
            seconds[name].append(took)
            print(f"round {round_ + 1} {name:>16}: {took:6.1f} s")
    base = statistics.median(seconds[next(iter(trainers))])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:>16}: median {median:6.1f} s/epoch ({median / base:.2f}x {next(iter(trainers))})")


if __name__ == "__main__":
    main()
