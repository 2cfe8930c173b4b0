-- How many tasks are prunable ($1 to $4: see candidates.sql).
SELECT count(*)
{CANDIDATES}
