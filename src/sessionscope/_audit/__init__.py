"""The runtime audit: every Session of an unchanged program guarded, violations recorded.

- ``_sites``: where application code stands (third-party frames stepped over too);
- ``_records``: what one violation is, and where a process writes them as they happen;
- ``_boot``: what runs at the start of each audited process (guard every new session);
- ``_thread_pools``: a task's thread-pool jobs (FastAPI's sync dependencies) join its unit of work;
- ``_report``: the records of all processes, deduplicated, as text and as data;
- ``_command``: ``python -m sessionscope audit``.

See docs/audit.md.
"""
