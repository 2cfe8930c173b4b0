-- The element and index of the instances $1, for their messages.
SELECT step_id, item, item_index FROM steps WHERE step_id = ANY ($1)
