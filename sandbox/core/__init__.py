"""The core layer: what every other layer shares and nothing here runs a job. `limits` and `units`
(policy and human units), `errors` (ConfigError; validation errors worded for people), `models`
(JobSpec, JobResult), `shipping` (callables to the job),
`display` (how a JobResult looks), `values` (job values as tagged JSON),
`channel` (child → supervisor JSON), `audit` (the audit log), `verdict` (the verdict from the
evidence, pure), `ratelimit` (token buckets)."""
