-- Seed knowledge base: respostas curtas em PT-BR que o agente de SDR da Sol Nascente Energia Solar envia aos leads no WhatsApp.
INSERT INTO knowledge_base (category, title, content, keywords) VALUES

-- como_funciona ------------------------------------------------------------
('como_funciona',
 'Como funciona a energia solar fotovoltaica',
 'As placas solares transformam a luz do sol em energia elétrica, e o inversor converte essa energia para o padrão usado na sua casa. O que você não consome na hora vai para a rede da distribuidora e vira crédito para abater na sua conta de luz.',
 'funciona funcionamento como explica explicar placa placas painel painéis paineis módulo modulos fotovoltaica fotovoltaico fotovoltaicos sol solar gera gerar geração geracao energia'),

('como_funciona',
 'Diferença entre sistema on-grid e off-grid',
 'O on-grid fica ligado à rede da distribuidora e usa o sistema de créditos, sem baterias, por isso é o mais comum e o mais barato. O off-grid funciona isolado, com baterias, e é indicado para lugares sem rede elétrica, como sítios afastados.',
 'ongrid offgrid on-grid off-grid grid conectado isolado autônomo autonomo rede diferença diferenca tipo tipos modelo sistema qual melhor'),

('como_funciona',
 'Funciona em dia nublado?',
 'Funciona sim, só gera menos: em dia nublado a produção cai, mas não zera, porque as placas aproveitam a luz difusa. O sistema é dimensionado pela média do ano inteiro, então os dias de muito sol compensam os dias nublados e chuvosos.',
 'nublado nublados nuvem nuvens chuva chuvoso chovendo garoa inverno encoberto dia dias sem sol funciona gera produz'),

('como_funciona',
 'E à noite, como fica a energia?',
 'À noite as placas não geram energia, então a casa usa a energia da rede normalmente. Só que durante o dia o sistema produz mais do que você consome, e esse excedente vira crédito que abate justamente o consumo da noite.',
 'noite noturno noturna escuro escureceu anoitecer madrugada sem sol de noite a noite'),

('como_funciona',
 'E se faltar luz? Queda de energia',
 'No sistema on-grid sem baterias, quando falta luz na rua o inversor desliga as placas automaticamente, por segurança, para não energizar a rede enquanto os eletricistas trabalham. Quando a energia volta ele religa sozinho. Para ter energia durante a queda, é preciso um sistema híbrido com baterias.',
 'faltar falta faltou luz apagão apagao queda quedas caiu cair acabou acabar blecaute blackout sem energia desliga desligar'),

('como_funciona',
 'O que é o inversor',
 'O inversor é o cérebro do sistema: converte a energia das placas para a tensão da sua casa, registra a geração e se desliga sozinho se houver falha na rede. Usamos inversores string ou microinversores, escolhidos conforme o telhado e as sombras.',
 'inversor inversores microinversor microinversores micro string conversor aparelho equipamento caixa'),

('como_funciona',
 'Quantas placas eu preciso',
 'A quantidade de placas depende do seu consumo em kWh. Aqui em São Paulo cada placa moderna, de cerca de 600 W, gera em média 65 a 75 kWh por mês, então uma casa que consome 400 kWh costuma precisar de umas 6 placas.',
 'quantas placas painéis paineis módulos quantidade número numero tamanho kwp potência potencia dimensionamento área area espaço metros'),

('como_funciona',
 'Posição do telhado e sombras',
 'O ideal no Brasil é a face do telhado voltada para o norte, mas leste e oeste também funcionam bem, com perda de geração em torno de 10% a 15%. Sombras de árvores, caixas d''água ou prédios vizinhos são avaliadas na visita técnica para definir a melhor posição das placas.',
 'sombra sombras sombreamento árvore arvore prédio predio norte sul leste oeste orientação orientacao inclinação ângulo posição face direção'),

('como_funciona',
 'Energia solar é segura?',
 'Sim. Usamos cabos e conectores próprios para energia solar, dispositivos de proteção como DPS e disjuntores e aterramento, tudo conforme as normas técnicas. O inversor monitora o sistema continuamente e se desliga sozinho em caso de falha.',
 'segurança seguranca perigo perigoso risco incêndio incendio fogo choque curto-circuito raio proteção dps aterramento'),

-- economia -----------------------------------------------------------------
('economia',
 'Quanto custa o sistema de energia solar',
 'O preço depende do seu consumo: uma casa com conta de uns R$ 400 costuma precisar de um sistema de 3 a 4 kWp, que fica em média entre R$ 11 mil e R$ 16 mil já instalado. O valor exato sai na proposta, feita a partir da sua conta de luz.',
 'quanto custa custo custos preço preco preços valor valores caro barato orçamento orcamento sai fica cobra cobram'),

('economia',
 'Quanto vou economizar na conta de luz',
 'Com o sistema bem dimensionado, a economia pode chegar a cerca de 90% da conta de luz. Continuam a taxa mínima da distribuidora, a iluminação pública e, para sistemas novos, uma parte do Fio B. A simulação com a sua conta mostra o valor exato.',
 'economizar economia economizo economiza economizaria reduzir redução reducao diminuir diminui baixar abaixar cair conta desconto quanto vou'),

('economia',
 'Taxa mínima: a conta zera?',
 'A conta não zera: a distribuidora continua cobrando o custo de disponibilidade, equivalente a 30 kWh no monofásico, 50 kWh no bifásico e 100 kWh no trifásico, mais a iluminação pública. Mesmo assim a conta fica bem pequena.',
 'taxa mínima minima custo disponibilidade zerar zera zerada zero iluminação iluminacao pública publica cip cosip monofásico bifásico trifásico'),

('economia',
 'Em quanto tempo o investimento se paga',
 'Em geral o investimento se paga entre 3 e 5 anos só com a economia na conta de luz. Como as placas duram mais de 25 anos, você passa uns 20 anos gerando energia praticamente de graça.',
 'payback retorno tempo pagar paga pago quitar recuperar recupero investimento investi anos quantos'),

('economia',
 'Proteção contra aumento da tarifa e bandeiras',
 'Com energia solar você fica bem menos exposto aos reajustes anuais da tarifa e às bandeiras amarela e vermelha. Como a maior parte da energia vem do seu telhado, cada aumento da conta faz o sistema render ainda mais.',
 'bandeira bandeiras vermelha amarela aumento aumentou reajuste tarifa tarifas inflação subir subiu alta'),

('economia',
 'Energia solar valoriza o imóvel',
 'Sim, um imóvel com energia solar tende a ser mais valorizado e mais procurado na hora de vender ou alugar, porque o próximo morador já recebe uma conta de luz bem menor. É um patrimônio que fica no imóvel por mais de 25 anos.',
 'valoriza valorizar valorização valorizacao imóvel imovel casa venda vender revenda patrimônio patrimonio benfeitoria'),

('economia',
 'Vale a pena investir em energia solar?',
 'Vale: o retorno da energia solar costuma passar de 20% ao ano, bem acima da poupança e de muitas aplicações de renda fixa. E a economia na conta de luz não paga imposto de renda.',
 'vale pena compensa compensar investir rentabilidade rende rendimento poupança poupanca cdi aplicação aplicacao negócio'),

-- financiamento ------------------------------------------------------------
('financiamento',
 'Financiamento de energia solar',
 'Sim, temos financiamento em linhas próprias para energia solar com bancos e cooperativas parceiros, em até 120 meses e com carência para começar a pagar. Na maioria dos casos a parcela fica parecida ou menor que o valor que você já paga hoje na conta de luz.',
 'financiamento financiamentos financiar financia financiado financiável parcela parcelas parcelar parcelado parcelamento prestação prestacao banco bancos juros 120 meses prazo mensal'),

('financiamento',
 'Carência e aprovação do crédito',
 'Nas linhas de crédito solar você pode ter até 90 dias de carência, então o sistema já está gerando economia antes da primeira parcela. A aprovação depende de análise de crédito e a resposta costuma sair em 1 a 2 dias úteis.',
 'carência carencia primeira parcela começar comecar quando aprovação aprovacao aprovado análise analise score nome sujo consulta'),

('financiamento',
 'Pagamento no cartão de crédito',
 'Aceitamos cartão de crédito em até 12 vezes, e dá para combinar uma entrada no cartão com o restante financiado. O consultor mostra as opções na proposta para você comparar.',
 'cartão cartao crédito credito vezes 12x parcelado parcelar visa master mastercard elo maquininha'),

('financiamento',
 'Crédito para produtor rural e pessoa jurídica',
 'Para o campo e para negócios há linhas específicas, como o Pronaf para o produtor rural e linhas para pessoa jurídica, com prazos longos e carência. Em muitos projetos a economia na conta de luz já paga a parcela desde o primeiro mês.',
 'pronaf rural produtor agricultor pj cnpj pessoa jurídica juridica bndes linha crédito'),

-- instalacao ---------------------------------------------------------------
('instalacao',
 'Quanto tempo demora a instalação',
 'A instalação no telhado leva de 1 a 3 dias na maioria das casas. O processo completo, com projeto, homologação na distribuidora e troca do medidor, costuma levar de 30 a 60 dias a partir da assinatura do contrato.',
 'demora demorar demorado tempo prazo instalacao instalação instalar dias semanas quando fica pronto rápido rapido obra'),

('instalacao',
 'Tipos de telhado: cerâmica, fibrocimento e laje',
 'Instalamos em telhado de cerâmica, fibrocimento, laje e outros tipos, sempre com estrutura de alumínio e fixação própria para cada telha. Na laje usamos suportes inclinados para as placas ficarem no ângulo certo.',
 'telhado telhados telha telhas cerâmica ceramica barro colonial romana portuguesa fibrocimento eternit amianto laje plana shingle tipo tipos'),

('instalacao',
 'Instalação em telhado metálico',
 'Sim, telhado metálico é um dos mais fáceis: fixamos perfis de alumínio direto nas telhas, com vedação própria para não ter infiltração. Serve para telha de zinco, galvalume e telha sanduíche, muito comuns em galpões e comércios.',
 'metal metais metálico metalico metálica metalica zinco galvalume aço aco chapa sanduíche sanduiche termoacústica galpão instalam instala telhado'),

('instalacao',
 'Instalação no solo',
 'Se o telhado não for adequado ou não tiver espaço, dá para instalar as placas no solo, com estrutura de alumínio ou aço galvanizado e base de concreto. É muito usado em sítios, chácaras e terrenos grandes, e ainda facilita a limpeza.',
 'solo chão chao terreno quintal sítio sitio chácara chacara fazenda carport garagem estacionamento estrutura'),

('instalacao',
 'Peso das placas e estado do telhado',
 'Placas e estrutura pesam cerca de 15 kg por metro quadrado, peso que a maioria dos telhados em bom estado suporta. Na visita técnica o engenheiro confere telhas e madeiramento e, se necessário, indica algum reforço antes.',
 'peso pesado pesa suporta aguenta madeiramento madeira estrutura reforço reforco quebrar quebra telha'),

('instalacao',
 'Documentos necessários',
 'Para começar precisamos de uma conta de luz recente e de documento com foto e CPF do titular da conta. Para financiar, o banco pede também comprovante de renda e de residência. Se a conta estiver em nome de outra pessoa, resolvemos com uma procuração simples.',
 'documento documentos documentação documentacao papel papéis papelada rg cpf cnh identidade comprovante renda residência procuração titular'),

('instalacao',
 'Ampliar o sistema depois',
 'Se o seu consumo aumentar, com ar-condicionado, piscina ou carro elétrico, dá para ampliar o sistema depois, acrescentando placas e, se preciso, outro inversor. A ampliação também passa por nova aprovação na distribuidora.',
 'ampliar ampliação ampliacao aumentar expandir acrescentar adicionar mais placas depois consumo aumentou'),

-- manutencao ---------------------------------------------------------------
('manutencao',
 'Energia solar precisa de manutenção?',
 'Precisa de bem pouca: basicamente limpar as placas 1 ou 2 vezes por ano e acompanhar a geração pelo aplicativo. O sistema não tem peças móveis, então quase não dá trabalho.',
 'manutenção manutencao precisa cuidado cuidados cuidar revisão revisao preventiva conserto trabalho'),

('manutencao',
 'Como limpar as placas solares',
 'Use só água e uma esponja macia ou rodo de pano, de preferência no começo da manhã ou no fim da tarde, com as placas frias. Evite detergente forte, escova dura e lavadora de alta pressão. Se preferir, nossa equipe faz a limpeza com segurança.',
 'limpar limpeza limpo lavar lavagem sujeira sujo suja poeira pó folhas fezes pássaro esponja água produto'),

('manutencao',
 'Aplicativo de monitoramento',
 'O inversor fica conectado ao Wi-Fi e você acompanha pelo celular quanto o sistema gera por dia, mês e ano. Nossa equipe também acompanha e avisa se notar alguma queda fora do normal na geração.',
 'aplicativo app celular monitorar monitoramento acompanhar acompanhamento wifi wi-fi internet relatório relatorio geração'),

('manutencao',
 'Vida útil do sistema',
 'As placas solares duram mais de 25 anos e continuam gerando depois disso, com perda lenta de eficiência, em torno de 0,5% ao ano. O inversor costuma durar de 10 a 15 anos e pode precisar ser trocado uma vez ao longo da vida do sistema.',
 'vida útil util dura durar duração duracao durabilidade anos estraga velho desgaste perde'),

-- garantia -----------------------------------------------------------------
('garantia',
 'Quais são as garantias',
 'As placas têm 25 anos de garantia de performance, com pelo menos 80% da potência, e cerca de 12 anos de garantia contra defeito de fabricação. O inversor tem 10 anos de garantia, e a nossa instalação tem 5 anos de garantia de serviço.',
 'garantia garantias garante garantido garantem cobertura defeito anos'),

('garantia',
 'Garantia do inversor',
 'O inversor tem garantia de fábrica de 10 anos nas marcas que trabalhamos, e alguns modelos permitem estender esse prazo. Se der qualquer problema, nossa equipe aciona o fabricante para você.',
 'inversor troca trocar queimou queimar parou defeito fabricante'),

('garantia',
 'Garantia da instalação',
 'Toda instalação da Sol Nascente tem 5 anos de garantia de serviço, cobrindo estrutura, fixação, cabeamento e vedação do telhado. Se aparecer qualquer problema causado pela instalação nesse período, resolvemos sem custo.',
 'serviço servico mão-de-obra goteira infiltração infiltracao vazamento vedação estrutura'),

('garantia',
 'Seguro do sistema',
 'Recomendamos fazer seguro do sistema contra roubo, danos elétricos e eventos climáticos como granizo e vendaval. Ajudamos a cotar com seguradoras parceiras, e em muitos casos dá para incluir as placas no seguro residencial que você já tem.',
 'seguro segurado seguradora roubo roubar furto raio sinistro apólice apolice proteger'),

('garantia',
 'Resistência a granizo e vento',
 'As placas têm vidro temperado e são certificadas em testes com granizo de 25 mm de diâmetro a cerca de 80 km/h. A estrutura é dimensionada para os ventos da sua região, seguindo a norma brasileira de cargas de vento.',
 'granizo pedra chuva-de-pedra vento ventania vendaval tempestade temporal resistente resiste aguenta quebra vidro voar'),

-- ofertas ------------------------------------------------------------------
('ofertas',
 'Visita técnica gratuita',
 'A visita técnica é gratuita e sem compromisso: um técnico da nossa equipe vai até o imóvel e avalia o telhado, as sombras e o padrão de entrada de energia. Assim a proposta fica precisa e sem surpresas no dia da instalação.',
 'visita técnica tecnica grátis gratis gratuita gratuito avaliação avaliacao agendar agendamento marcar vistoria compromisso'),

('ofertas',
 'Desconto para pagamento à vista',
 'No pagamento à vista, por Pix ou transferência, oferecemos um desconto especial que já aparece na sua proposta. É a forma de pagamento que deixa o retorno do investimento mais rápido.',
 'desconto descontos vista pix transferência dinheiro promoção promocao promo oferta condição especial'),

('ofertas',
 'Energia solar por assinatura',
 'Se você mora de aluguel ou sua conta é menor que R$ 300, pode assinar energia de uma usina solar parceira, sem instalar nada e sem investimento. Você continua com a sua distribuidora e recebe desconto de até 15% na conta de luz todo mês.',
 'assinatura assinar assino compartilhada usina remota apartamento inquilino conta pequena baixa barata menor reais desconto 15%'),

('ofertas',
 'Atendemos empresas e comércios',
 'Atendemos empresas, comércios, indústrias e condomínios, em baixa ou média tensão, com projeto sob medida. Para negócios a energia é um dos maiores custos fixos, e o sistema costuma se pagar em 3 a 4 anos.',
 'empresa empresas comercial comércio comercio loja lojas negócio negocio indústria industria galpão condomínio cnpj pj'),

('ofertas',
 'Energia solar para sítio, fazenda e propriedade rural',
 'No campo a energia solar reduz bastante o custo com bomba de irrigação, ordenha, granja e câmara fria, com placas no solo ou no telhado do galpão. Fazemos projetos para sítios, chácaras e fazendas em todo o estado de São Paulo.',
 'rural fazenda sítio sitio chácara chacara agro agronegócio produtor irrigação irrigacao bomba poço granja ordenha gado'),

('ofertas',
 'Carregador para carro elétrico',
 'Dá para incluir um carregador de carro elétrico no projeto e dimensionar o sistema para abastecer o carro com energia do sol. Assim a recarga sai muito mais barata do que o combustível.',
 'carro elétrico eletrico veículo veiculo carregador wallbox recarga recarregar abastecer híbrido'),

-- empresa ------------------------------------------------------------------
('empresa',
 'Sobre a Sol Nascente Energia Solar',
 'A Sol Nascente é de Campinas, está há 9 anos no mercado e já instalou mais de 4.000 sistemas em todo o estado de São Paulo. Cuidamos de tudo, do projeto à homologação e ao pós-venda, com equipe própria de engenheiros e instaladores.',
 'sol nascente quem são somos confiável confiavel experiência história historia mercado campinas sobre referência'),

('empresa',
 'Região de atendimento',
 'Atendemos todo o estado de São Paulo a partir da nossa sede em Campinas, incluindo capital, interior e litoral. A visita técnica e a instalação são feitas pela nossa própria equipe.',
 'atendem atende atendimento região regiao cidade cidades onde local estado sp interior capital litoral campinas sorocaba jundiaí jundiai piracicaba limeira americana sumaré indaiatuba valinhos ribeirão santos'),

('empresa',
 'Credenciais e certificações',
 'Todos os projetos são assinados por engenheiro eletricista com registro no CREA e emissão de ART. Usamos apenas placas e inversores certificados pelo Inmetro, de fabricantes reconhecidos, e seguimos as normas da ABNT e das distribuidoras.',
 'certificado certificados certificação certificacao crea art engenheiro inmetro norma normas abnt qualidade marca marcas'),

('empresa',
 'Como montamos a sua proposta',
 'A proposta é feita a partir da sua conta de luz: olhamos o consumo médio em kWh dos últimos 12 meses, o tipo de ligação e a tarifa. Se quiser, manda uma foto da conta aqui mesmo no WhatsApp que o consultor prepara a simulação.',
 'proposta orçamento orcamento simulação simulacao cotação cotacao conta foto kwh consumo calcular cálculo dimensionar'),

('empresa',
 'Suporte pós-venda',
 'Depois da instalação você continua com a gente: suporte pelo WhatsApp, monitoramento da geração e visita técnica se algo sair do normal. Nosso compromisso é com o sistema funcionando bem por muitos anos.',
 'suporte pós-venda pos-venda atendimento assistência assistencia ajuda problema contato'),

-- regulacao ----------------------------------------------------------------
('regulacao',
 'O que é a Lei 14.300',
 'A Lei 14.300, de 2022, é o marco legal da geração distribuída: garante o direito de gerar a própria energia e usar o sistema de créditos com a distribuidora. Ela também criou a cobrança gradual do Fio B sobre a energia compensada para quem conectou a partir de 2023.',
 'lei 14.300 14300 14 300 marco legal geração distribuída distribuida regra regras legislação legislacao taxação taxacao taxa sol governo nova'),

('regulacao',
 'O que é o Fio B e a transição',
 'O Fio B é a parte da tarifa que remunera o uso da rede da distribuidora. Para sistemas novos a cobrança sobre a energia compensada é escalonada: 60% do Fio B em 2026, 75% em 2027 e 90% em 2028, e mesmo assim a energia solar continua com ótimo retorno.',
 'fio fiob tusd taxação taxacao taxa cobrança cobranca transição transicao escalonamento 2026 2027 2028'),

('regulacao',
 'Regra para quem instalou antes de 2023',
 'Quem protocolou o pedido de conexão na distribuidora até 7 de janeiro de 2023 mantém as regras antigas, sem a cobrança do Fio B, até o fim de 2045. Quem conecta agora segue a transição da Lei 14.300, que ainda é bem vantajosa.',
 'direito adquirido antigo antiga regra antes 2023 2045 instalei'),

('regulacao',
 'Créditos de energia com a distribuidora',
 'A energia que sobra é injetada na rede e vira crédito em kWh, no sistema de compensação. Os créditos valem por 60 meses e também podem abater a conta de outro imóvel no mesmo CPF ou CNPJ, dentro da área da mesma distribuidora.',
 'crédito créditos credito creditos compensação compensacao net metering sobra sobrar excedente injetar distribuidora concessionária cpfl enel edp elektro outro imóvel validade'),

('regulacao',
 'Homologação na distribuidora',
 'Cuidamos de toda a homologação: enviamos o projeto com ART do engenheiro à distribuidora, como CPFL, Enel, EDP ou Elektro, e acompanhamos aprovação e vistoria. Depois a distribuidora troca o medidor por um bidirecional e o sistema começa a gerar créditos.',
 'homologação homologacao homologar aprovação aprovacao distribuidora concessionária medidor relógio relogio bidirecional vistoria parecer acesso burocracia'),

-- baterias -----------------------------------------------------------------
('baterias',
 'Preciso de bateria?',
 'Na maioria dos casos não: no sistema on-grid a rede da distribuidora funciona como uma bateria, guardando o excedente em forma de créditos. A bateria só é indicada para quem quer energia durante quedas de luz ou para lugares sem rede.',
 'bateria baterias precisa preciso necessário armazenar guardar acumular armazenamento'),

('baterias',
 'Custo da bateria e do sistema híbrido',
 'Baterias de lítio ainda encarecem bastante o projeto: um banco de cerca de 5 kWh com inversor híbrido costuma acrescentar de R$ 15 mil a R$ 25 mil. Por isso indicamos principalmente para quem precisa de backup, como home office, freezer ou equipamento médico.',
 'bateria baterias quanto custa custam lítio litio preço valor custo caro kwh armazenamento'),

('baterias',
 'Sistema híbrido com backup',
 'O sistema híbrido junta placas, inversor híbrido e baterias: durante o dia carrega as baterias e, numa queda da rede, mantém ligados os circuitos escolhidos, como geladeira, iluminação e internet. Você continua usando os créditos com a distribuidora normalmente.',
 'híbrido hibrido backup nobreak autonomia apagão queda geladeira energia reserva'),

-- objecoes -----------------------------------------------------------------
('objecoes',
 'Energia solar é muito cara',
 'Entendo! Vale pensar como uma troca: com o financiamento a parcela costuma ficar perto do que você já paga de luz, e depois de quitado a economia fica toda com você. O sistema se paga em 3 a 5 anos e dura mais de 25.',
 'caro cara caríssimo carissimo dinheiro grana apertado bolso cabe orçamento alto'),

('objecoes',
 'Moro de aluguel, posso ter energia solar?',
 'Pode sim! A opção mais prática é a energia solar por assinatura, com até 15% de desconto na conta e sem nenhuma instalação. Se o proprietário autorizar, também dá para instalar um sistema e levar com você quando se mudar.',
 'aluguel alugado alugada alugo moro inquilino locatário locatario proprietário dono casa apartamento'),

('objecoes',
 'Vou me mudar, e o sistema?',
 'Sem problema: o sistema pode ser desmontado e reinstalado no novo endereço, e nossa equipe faz esse serviço. Se for na área da mesma distribuidora, os créditos que sobrarem podem ir para a conta da casa nova.',
 'mudar mudança mudanca mudo mudando vender levar levo transferir endereço endereco sair'),

('objecoes',
 'Meu telhado é velho',
 'Sem problema: na visita técnica avaliamos telhas e madeiramento e, se precisar de reforma, indicamos o que fazer antes de instalar. Muitas vezes basta trocar algumas telhas, e as placas ainda ajudam a proteger o telhado do sol e da chuva.',
 'velho antigo ruim estragado quebrado reforma reformar trocar goteira madeira podre'),

('objecoes',
 'Vou esperar o preço cair',
 'Esperar costuma sair mais caro: enquanto isso você continua pagando a conta cheia todo mês, e a tarifa de energia sobe quase todo ano. A economia de poucos meses já cobre a maioria das quedas de preço dos equipamentos.',
 'esperar espero depois pensar pensando ano que vem cair baixar momento agora'),

('objecoes',
 'Energia solar funciona mesmo? É confiável?',
 'Funciona, e é uma tecnologia madura: milhões de imóveis no Brasil já geram a própria energia com o sol. Aqui na Sol Nascente já são mais de 4.000 sistemas instalados, e você pode acompanhar a geração do seu pelo aplicativo.',
 'confiável confiavel mesmo verdade golpe certo desconfiado medo dúvida');
