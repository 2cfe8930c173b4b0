-- One statement: create the namespace if needed, then the template if absent.
-- $1: namespace, $2: name, $3: version, $4: description, $5: definition.
WITH new_namespace AS (
    INSERT INTO namespaces (name) VALUES ($1)
    ON CONFLICT (name) DO NOTHING
    RETURNING namespace_id
),
namespace AS (
    SELECT namespace_id, true AS is_new FROM new_namespace
    UNION ALL
    SELECT namespace_id, false FROM namespaces WHERE name = $1
),
inserted AS (
    INSERT INTO templates (namespace_id, name, version, description, definition)
    SELECT namespace_id, $2, $3, $4, $5 FROM namespace LIMIT 1
    ON CONFLICT (namespace_id, name, version) DO NOTHING
    RETURNING template_id, created_at
)
SELECT i.template_id, i.created_at, (SELECT bool_or(is_new) FROM namespace) AS new_namespace
FROM inserted i
