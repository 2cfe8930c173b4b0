-- Every template, unordered (the caller sorts versions by semver).
SELECT n.name AS namespace, t.name, t.version, t.description,
       jsonb_array_length(t.definition -> 'steps') AS step_count
FROM templates t JOIN namespaces n USING (namespace_id)
