"""What happens to an accepted message, in four parts one can read apart.

- message.py: the Message and its step records;
- admission.py: the in-flight slots a webhook claims before it accepts a message;
- loop.py: the worker's asyncio loop thread on which messages and chores run;
- flow.py: the message's steps after the webhook (agent, reply) and its final trace;
- chores.py: the periodic jobs of a worker (sweep, purge, pruning, resource samples).
"""
