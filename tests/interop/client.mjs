// An independent Privacy Pass client for the interoperability test (tests/test_passes_interop.py):
// Cloudflare's privacypass-ts (RFC 9578 issuance protocol 1, VOPRF(P-384, SHA-384)) on its own
// RFC 9497 code, voprf-ts; none of the issuer's code or its Python/Rust VOPRF.
//
//   node client.mjs buy DIRECTORY_URL --token T --idempotency-key K
//        [--www-authenticate HEADER | --issuer-name NAME [--origin-info A,B]] [--strict-directory]
//     fetches the issuer directory, buys one pass (TokenRequest, TokenResponse, the issuer's proof
//     verified, the Token finalized) and prints one JSON line: token (base64url), authorization
//     (the RFC 9577 header value), challenge (base64url TokenChallenge), challenge_digest (hex).
//   node client.mjs verify --seed HEX --info TEXT TOKEN...
//     recomputes each TOKEN's authenticator with the key RFC 9497 DeriveKeyPair(seed, info)
//     makes; prints "valid" or "invalid" for each, and exits 1 unless all are valid.
//   node client.mjs issue --seed HEX --info TEXT REQUEST
//     answers a base64url TokenRequest as an issuer with that key; prints the TokenResponse.
//
// Any failure (an HTTP error, a proof that does not verify, a malformed answer) exits non-zero.

import { webcrypto } from 'node:crypto';
import { parseArgs } from 'node:util';

import {
    AuthorizationHeader,
    Token,
    TokenChallenge,
    WWWAuthenticateHeader,
    privateVerif,
} from '@cloudflare/privacypass-ts';
import { Oprf, deriveKeyPair } from '@cloudflare/voprf-ts';
import { base64url } from 'rfc4648';

// The libraries call Web Crypto through the global `crypto`, which Node 18 (Debian 12's) does
// not define for a script (only node:crypto's webcrypto); Node 20 does.
globalThis.crypto ??= webcrypto;

const DIRECTORY_MEDIA = 'application/private-token-issuer-directory';
const REQUEST_MEDIA = 'application/private-token-request';
const RESPONSE_MEDIA = 'application/private-token-response';
const { VOPRF } = privateVerif;

const b64 = (bytes) => base64url.stringify(bytes, { pad: false });
const unb64 = (text, strict = false) => base64url.parse(text, { loose: !strict });
const hex = (bytes) => Buffer.from(bytes).toString('hex');

async function get(url, media) {
    const response = await fetch(url, { headers: { accept: media } });
    if (response.status !== 200) {
        throw new Error(`GET ${url}: ${response.status} ${await response.text()}`);
    }
    return response;
}

function challengeFrom(args, directoryUrl, tokenKey) {
    if (args['www-authenticate'] !== undefined) {
        const [offer, ...others] = WWWAuthenticateHeader.parse(args['www-authenticate']);
        if (offer === undefined || others.length > 0) {
            throw new Error('expected one PrivateToken challenge in --www-authenticate');
        }
        if (hex(offer.tokenKey) !== hex(tokenKey)) {
            throw new Error("the challenge's token-key is not the issuer directory's key");
        }
        return offer.challenge;
    }
    const issuerName = args['issuer-name'] ?? new URL(directoryUrl).host;
    const originInfo = args['origin-info']?.split(',');
    const context = crypto.getRandomValues(new Uint8Array(32));
    return new TokenChallenge(VOPRF.value, issuerName, context, originInfo);
}

async function buy(args, directoryUrl) {
    if (!args.token || !args['idempotency-key']) {
        throw new Error('buy needs --token and --idempotency-key');
    }
    const response = await get(directoryUrl, DIRECTORY_MEDIA);
    const media = response.headers.get('content-type');
    if (media !== DIRECTORY_MEDIA) {
        throw new Error(`the directory came as ${media}, not ${DIRECTORY_MEDIA}`);
    }
    const directory = await response.json();
    // RFC 9578 section 4: the first key of the type whose "not-before" (if any) is past.
    const now = Date.now() / 1000;
    const entry = directory['token-keys'].find(
        (k) => k['token-type'] === VOPRF.value && !(k['not-before'] > now),
    );
    if (entry === undefined) {
        throw new Error('the issuer directory lists no usable key of token type 1');
    }
    // RFC 9578 section 4: "the base64url encoding of the Public Key ..., including padding".
    const tokenKey = unb64(entry['token-key'], args['strict-directory']);
    const challenge = challengeFrom(args, directoryUrl, tokenKey);

    const client = new privateVerif.Client();
    const request = await client.createTokenRequest(challenge, tokenKey);
    const issuerUrl = new URL(directory['issuer-request-uri'], directoryUrl);
    const answer = await fetch(issuerUrl, {
        method: 'POST',
        headers: {
            'content-type': REQUEST_MEDIA,
            accept: RESPONSE_MEDIA,
            authorization: `Bearer ${args.token}`,
            'idempotency-key': args['idempotency-key'],
        },
        body: request.serialize(),
    });
    if (answer.status !== 200) {
        throw new Error(`POST ${issuerUrl}: ${answer.status} ${await answer.text()}`);
    }
    if (answer.headers.get('content-type') !== RESPONSE_MEDIA) {
        throw new Error(`the TokenResponse came as ${answer.headers.get('content-type')}`);
    }
    const body = new Uint8Array(await answer.arrayBuffer());
    const expected = VOPRF.Ne + 2 * VOPRF.Ns;
    if (body.length !== expected) {
        throw new Error(`a TokenResponse is ${expected} bytes, this one ${body.length}`);
    }
    // finalize() verifies the issuer's DLEQ proof against the directory's key ("proof failed").
    const token = await client.finalize(client.deserializeTokenResponse(body));
    const serialized = challenge.serialize();
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', serialized));
    if (hex(token.authInput.challengeDigest) !== hex(digest)) {
        throw new Error("the token's challenge_digest is not SHA-256 of the challenge");
    }
    return {
        token: b64(token.serialize()),
        authorization: new AuthorizationHeader(token).toString(true),
        challenge: b64(serialized),
        challenge_digest: hex(digest),
    };
}

function derivedKey(args) {
    if (!/^[0-9a-f]{64}$/i.test(args.seed ?? '') || args.info === undefined) {
        throw new Error('--seed (64 hex) and --info are required');
    }
    const seed = Uint8Array.from(Buffer.from(args.seed, 'hex'));
    const info = new TextEncoder().encode(args.info);
    return deriveKeyPair(Oprf.Mode.VOPRF, VOPRF.suite, seed, info);
}

async function main() {
    const { values: args, positionals } = parseArgs({
        allowPositionals: true,
        options: {
            token: { type: 'string' },
            'idempotency-key': { type: 'string' },
            'www-authenticate': { type: 'string' },
            'issuer-name': { type: 'string' },
            'origin-info': { type: 'string' },
            'strict-directory': { type: 'boolean', default: false },
            seed: { type: 'string' },
            info: { type: 'string' },
        },
    });
    const [command, operand, ...extra] = positionals;
    if (operand === undefined || (extra.length > 0 && command !== 'verify')) {
        throw new Error('usage: client.mjs buy DIRECTORY_URL | verify TOKEN... | issue REQUEST');
    }
    if (command === 'buy') {
        console.log(JSON.stringify(await buy(args, operand)));
    } else if (command === 'verify') {
        const { privateKey } = await derivedKey(args);
        for (const text of [operand, ...extra]) {
            const token = Token.deserialize(VOPRF, unb64(text));
            const valid = await privateVerif.verifyToken(token, privateKey);
            console.log(valid ? 'valid' : 'invalid');
            process.exitCode = valid ? process.exitCode : 1;
        }
    } else if (command === 'issue') {
        const { privateKey, publicKey } = await derivedKey(args);
        const issuer = new privateVerif.Issuer('interop', privateKey, publicKey);
        const request = privateVerif.TokenRequest.deserialize(unb64(operand));
        const keyId = await issuer.tokenKeyID();
        if (request.truncatedTokenKeyId !== keyId[keyId.length - 1]) {
            throw new Error('the request names another key');
        }
        console.log(b64((await issuer.issue(request)).serialize()));
    } else {
        throw new Error(`unknown command ${command}`);
    }
}

try {
    await main();
} catch (error) {
    console.error(`client.mjs: ${error?.message ?? error}`);
    process.exitCode = 2;
}
