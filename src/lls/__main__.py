"""The ``lls`` command (``python -m lls`` and the console script): :func:`lls.cli.main`, with
Ctrl-C answered however early or late it comes."""

import signal
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


def run() -> int:
    # Importing torch takes seconds, and a KeyboardInterrupt raised inside its C++ start-up can
    # abort the process (std::terminate); a Ctrl-C in those seconds is noted and answered after.
    asked = []
    signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
    from .cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if asked:
            raise KeyboardInterrupt
        code = main()
    except KeyboardInterrupt:  # during the imports, or while main printed its last line
        print("lls: aborted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # answered: a Ctrl-C during the exit changes nothing
    return code


if __name__ == "__main__":
    raise SystemExit(run())
