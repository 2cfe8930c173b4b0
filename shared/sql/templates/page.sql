-- A page of templates: the first $3 of them (by namespace and name, in byte order) after
-- the cursor's ($1, $2), only namespace $4 and name $5 when given; each with every
-- version, unordered (the caller sorts versions by semver).
WITH page AS (
    SELECT DISTINCT n.namespace_id, n.name COLLATE "C" AS namespace, t.name COLLATE "C" AS name
    FROM templates t JOIN namespaces n USING (namespace_id)
    WHERE ($1::text IS NULL OR (n.name COLLATE "C", t.name COLLATE "C") > ($1, $2))
      AND ($4::text IS NULL OR n.name = $4)
      AND ($5::text IS NULL OR t.name = $5)
    ORDER BY 2, 3
    LIMIT $3
)
SELECT page.namespace::text AS namespace, page.name::text AS name, t.version, t.description,
       jsonb_array_length(t.definition -> 'steps') AS step_count
FROM page JOIN templates t ON t.namespace_id = page.namespace_id AND t.name = page.name
