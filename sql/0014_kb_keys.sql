-- The knowledge base becomes what `sdrctl kb` edits (issue #19): a stable key per entry
-- (what an import matches on), the questions it answers (weighted as its keywords in
-- full-text search), the hash of what gets embedded, and a log of imports.
--
-- The 61 entries 0002 seeded get the keys of their files in knowledge/ (a slug of the
-- title; matched by title, so ids do not matter); a row whose title was edited since, or a
-- row added by hand, gets "entry-<id>", which `sdrctl kb export` shows and a later import
-- can replace.

ALTER TABLE knowledge_base
    ADD COLUMN key text,
    ADD COLUMN questions text[] NOT NULL DEFAULT '{}';

UPDATE knowledge_base k SET key = v.key
  FROM (VALUES
    ('Como funciona a energia solar fotovoltaica', 'como-funciona-a-energia-solar-fotovoltaica'),
    ('Diferença entre sistema on-grid e off-grid', 'diferenca-entre-sistema-on-grid-e-off-grid'),
    ('Funciona em dia nublado?', 'funciona-em-dia-nublado'),
    ('E à noite, como fica a energia?', 'e-a-noite-como-fica-a-energia'),
    ('E se faltar luz? Queda de energia', 'e-se-faltar-luz-queda-de-energia'),
    ('O que é o inversor', 'o-que-e-o-inversor'),
    ('Quantas placas eu preciso', 'quantas-placas-eu-preciso'),
    ('Posição do telhado e sombras', 'posicao-do-telhado-e-sombras'),
    ('Energia solar é segura?', 'energia-solar-e-segura'),
    ('Quanto custa o sistema de energia solar', 'quanto-custa-o-sistema-de-energia-solar'),
    ('Quanto vou economizar na conta de luz', 'quanto-vou-economizar-na-conta-de-luz'),
    ('Taxa mínima: a conta zera?', 'taxa-minima-a-conta-zera'),
    ('Em quanto tempo o investimento se paga', 'em-quanto-tempo-o-investimento-se-paga'),
    ('Proteção contra aumento da tarifa e bandeiras', 'protecao-contra-aumento-da-tarifa-e-bandeiras'),
    ('Energia solar valoriza o imóvel', 'energia-solar-valoriza-o-imovel'),
    ('Vale a pena investir em energia solar?', 'vale-a-pena-investir-em-energia-solar'),
    ('Financiamento de energia solar', 'financiamento-de-energia-solar'),
    ('Carência e aprovação do crédito', 'carencia-e-aprovacao-do-credito'),
    ('Pagamento no cartão de crédito', 'pagamento-no-cartao-de-credito'),
    ('Crédito para produtor rural e pessoa jurídica', 'credito-para-produtor-rural-e-pessoa-juridica'),
    ('Quanto tempo demora a instalação', 'quanto-tempo-demora-a-instalacao'),
    ('Tipos de telhado: cerâmica, fibrocimento e laje', 'tipos-de-telhado-ceramica-fibrocimento-e-laje'),
    ('Instalação em telhado metálico', 'instalacao-em-telhado-metalico'),
    ('Instalação no solo', 'instalacao-no-solo'),
    ('Peso das placas e estado do telhado', 'peso-das-placas-e-estado-do-telhado'),
    ('Documentos necessários', 'documentos-necessarios'),
    ('Ampliar o sistema depois', 'ampliar-o-sistema-depois'),
    ('Energia solar precisa de manutenção?', 'energia-solar-precisa-de-manutencao'),
    ('Como limpar as placas solares', 'como-limpar-as-placas-solares'),
    ('Aplicativo de monitoramento', 'aplicativo-de-monitoramento'),
    ('Vida útil do sistema', 'vida-util-do-sistema'),
    ('Quais são as garantias', 'quais-sao-as-garantias'),
    ('Garantia do inversor', 'garantia-do-inversor'),
    ('Garantia da instalação', 'garantia-da-instalacao'),
    ('Seguro do sistema', 'seguro-do-sistema'),
    ('Resistência a granizo e vento', 'resistencia-a-granizo-e-vento'),
    ('Visita técnica gratuita', 'visita-tecnica-gratuita'),
    ('Desconto para pagamento à vista', 'desconto-para-pagamento-a-vista'),
    ('Energia solar por assinatura', 'energia-solar-por-assinatura'),
    ('Atendemos empresas e comércios', 'atendemos-empresas-e-comercios'),
    ('Energia solar para sítio, fazenda e propriedade rural', 'energia-solar-para-sitio-fazenda-e-propriedade-rural'),
    ('Carregador para carro elétrico', 'carregador-para-carro-eletrico'),
    ('Sobre a Sol Nascente Energia Solar', 'sobre-a-sol-nascente-energia-solar'),
    ('Região de atendimento', 'regiao-de-atendimento'),
    ('Credenciais e certificações', 'credenciais-e-certificacoes'),
    ('Como montamos a sua proposta', 'como-montamos-a-sua-proposta'),
    ('Suporte pós-venda', 'suporte-pos-venda'),
    ('O que é a Lei 14.300', 'o-que-e-a-lei-14-300'),
    ('O que é o Fio B e a transição', 'o-que-e-o-fio-b-e-a-transicao'),
    ('Regra para quem instalou antes de 2023', 'regra-para-quem-instalou-antes-de-2023'),
    ('Créditos de energia com a distribuidora', 'creditos-de-energia-com-a-distribuidora'),
    ('Homologação na distribuidora', 'homologacao-na-distribuidora'),
    ('Preciso de bateria?', 'preciso-de-bateria'),
    ('Custo da bateria e do sistema híbrido', 'custo-da-bateria-e-do-sistema-hibrido'),
    ('Sistema híbrido com backup', 'sistema-hibrido-com-backup'),
    ('Energia solar é muito cara', 'energia-solar-e-muito-cara'),
    ('Moro de aluguel, posso ter energia solar?', 'moro-de-aluguel-posso-ter-energia-solar'),
    ('Vou me mudar, e o sistema?', 'vou-me-mudar-e-o-sistema'),
    ('Meu telhado é velho', 'meu-telhado-e-velho'),
    ('Vou esperar o preço cair', 'vou-esperar-o-preco-cair'),
    ('Energia solar funciona mesmo? É confiável?', 'energia-solar-funciona-mesmo-e-confiavel')
  ) AS v(title, key)
 WHERE k.title = v.title
   AND k.id = (SELECT min(id) FROM knowledge_base WHERE title = v.title);

UPDATE knowledge_base SET key = 'entry-' || id WHERE key IS NULL;

ALTER TABLE knowledge_base ALTER COLUMN key SET NOT NULL;

ALTER TABLE knowledge_base ADD CONSTRAINT knowledge_base_key_key UNIQUE (key);

-- What is embedded for search by meaning, hashed: as daemon/knowledge/entry.py's
-- content_hash (title, questions and content, one per line), generated by PostgreSQL so an
-- edit made in SQL changes it too (and the entry is embedded again). A generated column
-- takes immutable functions only; convert_to, concat_ws and array_to_string are stable
-- (they serve any encoding or type), on these text arguments they are immutable: hence
-- the wrappers.
CREATE FUNCTION knowledge_content_hash(title text, questions text[], content text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT encode(sha256(convert_to(
              concat_ws(E'\n', title, NULLIF(array_to_string(questions, E'\n'), ''), content), 'UTF8')), 'hex') $$;

ALTER TABLE knowledge_base ADD COLUMN content_hash text NOT NULL
    GENERATED ALWAYS AS (knowledge_content_hash(title, questions, content)) STORED;

-- Full-text search reads the questions too, at the keywords' weight (B); with no questions
-- an entry's tsv is what it was, so the seeded entries rank as before. Dropping tsv drops
-- 0003's GIN index: it is built again under the same name (in this transaction, not
-- concurrently: a knowledge base holds hundreds of rows, not millions).
CREATE FUNCTION knowledge_words(text[]) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT array_to_string($1, ' ') $$;

ALTER TABLE knowledge_base DROP COLUMN tsv;

ALTER TABLE knowledge_base ADD COLUMN tsv tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('portuguese', title), 'A') ||
    setweight(to_tsvector('portuguese', keywords), 'B') ||
    setweight(to_tsvector('portuguese', knowledge_words(questions)), 'B') ||
    setweight(to_tsvector('portuguese', content), 'C')) STORED;

CREATE INDEX knowledge_base_tsv_idx ON knowledge_base USING gin (tsv);

-- One row per `sdrctl kb import --apply` and per import of the shipped knowledge/ folder;
-- none yet means the daemon's first start imports that folder.
CREATE TABLE kb_imports (
    id           bigserial PRIMARY KEY,
    source       text NOT NULL,
    added        integer NOT NULL,
    changed      integer NOT NULL,
    removed      integer NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now()
);
