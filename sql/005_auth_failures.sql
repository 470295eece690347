-- Failed authentications per client address and minute, shared by every worker and replica,
-- so "more than N failures a minute" means N for the whole service, not N per process.
-- UNLOGGED: a rate limiter does not need crash safety, and skipping WAL keeps it cheap.
CREATE UNLOGGED TABLE IF NOT EXISTS auth_failure (
    address      text        NOT NULL,
    window_start timestamptz NOT NULL,
    failures     integer     NOT NULL,
    PRIMARY KEY (address, window_start)
);
