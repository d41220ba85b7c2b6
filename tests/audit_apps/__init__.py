"""Small real applications for the runtime audit's tests (``tests/test_audit.py``).

Each runs unchanged under ``python -m sessionscope audit``, in a ``planted`` variant with
share-nothing violations and a ``clean`` one doing the same work correctly. The lines the audit
must name carry a marker comment (``# audit: <kinds> created`` / ``# audit: <kinds> crossed``),
which the tests look up, so the apps can be edited without renumbering anything.
"""
