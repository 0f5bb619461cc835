-- A card recharge is recorded in one statement: the payment (with its key and outbox row) and
-- the card's move from sold to redeemed must both happen or neither. A statement cannot roll
-- itself back, but an error aborts it and its implicit transaction: this function raises when
-- the keys won and the cards moved differ (a card whose state changed between the statement's
-- snapshot and its update), and otherwise says whether the recharge happened.
CREATE FUNCTION gridpay_recharged(keys bigint, moved bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF keys <> moved THEN
        RAISE EXCEPTION 'card recharge: % payment(s) but % card move(s); nothing recorded',
            keys, moved USING ERRCODE = 'GP002';
    END IF;
    RETURN moved = 1;
END $$;
