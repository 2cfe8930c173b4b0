-- The template $1/$2 at version $3, or every version when $3 is NULL.
SELECT template_id, version, definition, created_at
FROM tasker_find_template($1, $2, $3)
