-- Which message a confirmed dispatch travelled in: the dispatch token of the first step
-- of its message (a step alone: its own token). Steps of one namespace published
-- together share one message (a `steps` batch, up to eight), so the sweeper's queue check
-- counts the messages its waiting steps need, not the steps, and compares them with the
-- queue's messages exactly (coordinator/src/sweeper.rs). Written with the lift of a
-- confirmed step's dispatch lease, the only rows the check reads; NULL before that, and
-- for the rows a coordinator of an earlier release lifted (the check counts those as up
-- to eight steps a message).
ALTER TABLE steps ADD COLUMN dispatch_message UUID;
