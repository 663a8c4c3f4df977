-- Settings of the database scripts/run.sh serves (the README tour's test applies them too):
-- picloud's functions on the search path, and quick retries so the tour can watch an event
-- fail five times in under two seconds (0.1 + 0.2 + 0.4 + 0.8 s). Production keeps the
-- defaults (1 s base, 1 h cap). Run with psql, which fills in :"DBNAME".
ALTER DATABASE :"DBNAME" SET search_path = "$user", public, picloud;
ALTER DATABASE :"DBNAME" SET picloud.retry_base_delay = '100ms';
ALTER DATABASE :"DBNAME" SET picloud.retry_max_delay = '1s';
