"""The pytest plugin's parts (the hooks are sandbox.pytest_plugin, the `pytest11` entry point):
`marker` reads `@pytest.mark.sandbox(...)`, `crossing` turns a test and its fixtures into a job,
`job` runs it inside the job, `outcome` turns the job's result back into pytest's outcome."""
