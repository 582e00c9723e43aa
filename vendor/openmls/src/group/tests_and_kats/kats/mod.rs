mod messages;
mod transcript_hashes;
