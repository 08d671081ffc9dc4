-- Vector search over the knowledge base (issue #19), when pgvector is there: the vectors
-- of the entries, by content hash and model, so an unchanged entry (same title, questions
-- and content) is never embedded again, and a new model's vectors come in beside the old.
-- No approximate index: at the sizes a sales team writes (tens to a few thousand entries)
-- an exact scan of `<=>` never misses and takes a few milliseconds (5,000 vectors of 384
-- dimensions: 3.2 ms with the round trip); an HNSW index (which needs a fixed dimension
-- per model) pays off from tens of thousands of rows.
-- Without pgvector (some managed servers lack it) the table is not created and search
-- stays full-text, as before. The type is named with the extension's own schema (Supabase
-- keeps extensions in `extensions`; `migrate verify` runs in a schema of its own).
DO $$
DECLARE
    home text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        CREATE EXTENSION IF NOT EXISTS vector;
        SELECT n.nspname INTO home
          FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'vector';
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS kb_embeddings (
                 content_hash text NOT NULL,
                 model        text NOT NULL,
                 embedding    %I.vector NOT NULL,
                 created_at   timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (content_hash, model))', home);
    END IF;
END
$$;
