"""Driving a Fuser from a test: each request in its own thread, the test's thread ticking."""

import threading


def drive(fuser, jobs) -> None:
    """Run each job (a function of nothing) in its own thread while this thread ticks the fuser."""
    errors = []

    def wrap(seq, job):
        try:
            job()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            fuser.detach(seq)

    threads = []
    for seq, job in enumerate(jobs):
        fuser.attach(seq)
        threads.append(threading.Thread(target=wrap, args=(seq, job)))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        fuser.tick(0.01)
    if errors:
        raise errors[0]
