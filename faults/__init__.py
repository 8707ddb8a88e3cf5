"""A Jepsen-style fault suite for a deployed euca-ha cloud on testbed hosts.

`history` (operations), `workloads` (boto3 clients), `checkers` (pure functions over a history
and the final state), `observe` (SSH into hosts, samplers, final state), `nemesis` (faults and
schedules), `cloud` (deploying onto a fresh bed), `runner` (one run end to end). See
docs/reliability.md.
"""
