export * from './chatrooms.js';
export * from './messages.js';
export * from './sessions.js';
export * from './subscriptions.js';
export * from './users.js';
