import type { ChatroomRow, MessageRow } from '../db/schema/index.js';

export interface MessageDto {
  id: string;
  chatroomId: string;
  role: 'user' | 'assistant';
  content: string;
  status: MessageRow['status'];
  replyToId: string | null;
  model: string | null;
  usage: MessageRow['usage'];
  finishReason: string | null;
  error: MessageRow['error'];
  createdAt: string;
  completedAt: string | null;
}

export function toMessageDto(row: MessageRow): MessageDto {
  return {
    id: row.id,
    chatroomId: row.chatroomId,
    role: row.role,
    content: row.content,
    status: row.status,
    replyToId: row.replyToId,
    model: row.model,
    usage: row.usage,
    finishReason: row.finishReason,
    error: row.error,
    createdAt: row.createdAt.toISOString(),
    completedAt: row.completedAt ? row.completedAt.toISOString() : null,
  };
}

export interface ChatroomDto {
  id: string;
  name: string;
  systemInstruction: string | null;
  createdAt: string;
  updatedAt: string;
  lastActivityAt: string;
}

export function toChatroomDto(row: ChatroomRow): ChatroomDto {
  return {
    id: row.id,
    name: row.name,
    systemInstruction: row.systemInstruction,
    createdAt: row.createdAt.toISOString(),
    updatedAt: row.updatedAt.toISOString(),
    lastActivityAt: row.lastActivityAt.toISOString(),
  };
}
